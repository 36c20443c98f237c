"""The validated settings of every flow (pydantic at the boundary), with every default written once."""
