"""Image bytes in: reading uploads, checked decoding to upright RGB, loading image files.

Named `io`, but with absolute imports `import io` in these modules is still the standard library.
"""
