"""SimpleBits for chest radiographs: simplify inputs to what a classifier really needs."""

__version__ = "0.1.0"
