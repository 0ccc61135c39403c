"""The HTTP surface: routes, their dependencies, request handling (admission, deadline, response) and the
optional API keys.
"""
