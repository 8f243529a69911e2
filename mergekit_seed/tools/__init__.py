"""Tools: ``compare`` (paired verdicts on your data), ``analyze`` (seeds before merging) and
the demo. They merge through the runner and use the layers below it; nothing below imports them."""
