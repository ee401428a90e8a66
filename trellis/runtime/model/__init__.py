"""The sharded Llama-family model: layers that own their TP slicing, the loader, attention."""
