"""
The built-in demo method package, served by the embedded default.

Each module below is one method, Toto style: C{echo.py} answers C{echo},
C{time/now.py} answers C{time.now}.  C{examples/methods/} shows the same
source; copy it to start a package of your own and name it in the
C{method_modules} setting.
"""
