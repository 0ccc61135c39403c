"""The models: the manifest (the contract between export and serving), manifest-driven preprocessing and
the ONNX Runtime sessions, loaded once and hash-checked.
"""
