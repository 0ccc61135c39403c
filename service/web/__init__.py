"""The capture web app (built from web/ into static/ by `make web`) and how the service serves it."""
