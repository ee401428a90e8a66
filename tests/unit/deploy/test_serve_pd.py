"""`trellis serve --prefill-replicas N`: N replicas prefill, the rest decode, in the spec it makes."""

from __future__ import annotations

import argparse

import pytest

from trellis.cli.main import build_parser
from trellis.cli.serve import build_spec
from trellis.core.errors import ConfigError
from trellis.core.spec import parse


def serve_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["serve", "--preset", "llama-3-8b", "--device", "cpu", "--dp", "2", *flags]
    )


def test_serve_prefill_replicas_split_the_roles() -> None:
    spec = build_spec(serve_args("--dp", "3", "--prefill-replicas", "1", "--max-local-prefill-tokens", "64"))
    assert [r.role for r in spec.replicas] == ["prefill", "decode", "decode"]
    assert spec.router.max_local_prefill_tokens == 64
    assert parse(spec.to_dict()) == spec
    assert [r.role for r in build_spec(serve_args()).replicas] == ["both", "both"]


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--prefill-replicas", "2"], "leaves no decode replica of the 2"),
        (["--prefill-replicas", "-1"], "--prefill-replicas must be >= 0"),
        (["--max-local-prefill-tokens", "8"], "needs --prefill-replicas N"),
    ],
)
def test_serve_prefill_replica_flags_are_checked(flags: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        build_spec(serve_args(*flags))
