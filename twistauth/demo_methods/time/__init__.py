"""
The C{time.*} demo methods.
"""
