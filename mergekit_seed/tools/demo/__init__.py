"""The embedded end-to-end default: tiny generated models merged through the real engines."""
