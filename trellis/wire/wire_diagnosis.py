"""Where bytes that protobuf refused to parse go wrong, named by the message's own fields.

upb says only "Wire format was corrupt" or "String field had bad UTF-8"; a client needs the field
("sampling.stop: a string that is not valid UTF-8"). `first_problem` walks the wire format the way
the parser does (tags, varints, lengths, nested messages, packed scalars, UTF-8 in string fields)
and returns the first problem it finds, or None when it finds none (the caller keeps upb's words).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_MAX_DEPTH = 100  # upb's default recursion limit
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_FIXED_SIZE = {_FIXED64: 8, _FIXED32: 4}
# Packed repeated scalars whose elements are varints (the fixed-size ones must divide the length).
_VARINT_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
}  # fmt: skip
_FIXED_TYPES = {
    FieldDescriptor.TYPE_FIXED32: 4, FieldDescriptor.TYPE_SFIXED32: 4, FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED64: 8, FieldDescriptor.TYPE_SFIXED64: 8, FieldDescriptor.TYPE_DOUBLE: 8,
}  # fmt: skip


class _Bad(Exception):
    """The first problem, as the message for a client."""


def first_problem(data: bytes, descriptor: Descriptor) -> str | None:
    """The first thing wrong with `data` as a `descriptor` message ("field: what"), or None."""
    try:
        _walk(data, 0, len(data), descriptor, "", 0, end_group=None)
    except _Bad as bad:
        return str(bad)
    return None


def _varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise _Bad(f"{what}: the bytes end inside a varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise _Bad(f"{what}: a varint longer than 10 bytes")


def _walk(
    data: bytes, pos: int, end: int, desc: Descriptor | None, path: str, depth: int, end_group: int | None
) -> int:
    """Checks fields from pos to end (or to the end-group tag of `end_group`); returns where it stopped."""
    if depth > _MAX_DEPTH:
        raise _Bad(f"{path.rstrip('.') or 'the message'}: nested more than {_MAX_DEPTH} deep")
    while pos < end:
        at = pos
        tag, pos = _varint(data, pos, end, f"{path}<tag at byte {at}>")
        number, wire = tag >> 3, tag & 7
        field = desc.fields_by_number.get(number) if desc is not None else None
        name = f"{path}{field.name if field is not None else f'field {number}'}"
        if number == 0 or number > 2**29 - 1:
            raise _Bad(f"{path}<tag at byte {at}>: field number {number} is not a valid field number")
        if wire == _VARINT:
            _, pos = _varint(data, pos, end, name)
        elif wire in _FIXED_SIZE:
            pos += _FIXED_SIZE[wire]
            if pos > end:
                raise _Bad(f"{name}: the bytes end inside a {_FIXED_SIZE[wire] * 8}-bit value")
        elif wire == _LENGTH:
            size, pos = _varint(data, pos, end, f"{name} (its length)")
            if pos + size > end:
                raise _Bad(f"{name}: its length says {size} bytes, {end - pos} remain")
            _check_payload(data, pos, pos + size, field, name, depth)
            pos += size
        elif wire == _START_GROUP:
            pos = _walk(data, pos, end, None, f"{name}.", depth + 1, end_group=number)
        elif wire == _END_GROUP:
            if end_group != number:
                raise _Bad(f"{name}: an end-group tag with no group open")
            return pos
        else:
            raise _Bad(f"{name}: wire type {wire} does not exist")
    if end_group is not None:
        raise _Bad(f"{path.rstrip('.')}: a group that never ends")
    return pos


def _check_payload(
    data: bytes, pos: int, end: int, field: FieldDescriptor | None, name: str, depth: int
) -> None:
    if field is None:
        return  # an unknown field's bytes are kept as they are
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            data[pos:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"{name}: a string that is not valid UTF-8 (byte {e.start} of it)") from None
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(data, pos, end, field.message_type, f"{name}.", depth + 1, end_group=None)
    elif field.type in _VARINT_TYPES:  # packed
        while pos < end:
            _, pos = _varint(data, pos, end, name)
    elif field.type in _FIXED_TYPES and (end - pos) % _FIXED_TYPES[field.type]:
        raise _Bad(f"{name}: {end - pos} packed bytes is not a whole number of values")
