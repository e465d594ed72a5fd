"""
The ``time.*`` demo methods.
"""
