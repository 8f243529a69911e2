"""Maths: tensors in, tensors out. Shared linear algebra (``linalg``), the paired bootstrap
(``stats``), the SeRA layer (``sera``) and one kernel module per paper (``kernels/``); nothing
here imports another layer of the package, mergekit, or anything that reads files."""
