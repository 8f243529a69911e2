"""Pure tensor math, one module per paper. No I/O and no mergekit imports."""
