"""What each command does, without printing: convert, dequantize, verify, the inspect view."""
