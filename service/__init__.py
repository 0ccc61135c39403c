"""CerviGate's serving code (FastAPI + ONNX Runtime, never torch), grouped by role: api/, pipeline/,
inference/, io/, render/; app.py builds the app, __main__.py runs it.
"""
