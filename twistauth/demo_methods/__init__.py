"""
The built-in demo method package, served by the embedded default.

Each module below is one method, Toto style: ``echo.py`` answers ``echo``,
``time/now.py`` answers ``time.now``.  ``examples/methods/`` shows the same
source; copy it to start a package of your own and name it in the
``method_modules`` setting.
"""
