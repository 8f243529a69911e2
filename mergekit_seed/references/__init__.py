"""References: what a recipe can name, and nothing about recipes. Weight files (which they
are, headers, hashes, tensors), Hub ids (revisions, the cache, downloads, pinned provenance),
adapter folders (every tensor by role; the LoRA adapter format we write) and the base model's
tensors and Conv1D layers. Imports the maths layer and the base only."""
