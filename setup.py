"""Packaging for twistauth.

Installed with ``pip install .`` (not ``-e``: a modern editable install hides
the twistd plugin from ``twistd``).  ``twisted.plugins`` is listed as a package
so the plugin module is installed beside Twisted's own.
"""

import re

from setuptools import find_packages, setup

setup(
    name="twistauth",
    version=re.search(r"\"(.+)\"", open("twistauth/_version.py").read()).group(1),
    description="Twisted authentication and session server: OIDC login, JSON methods, "
    "session caches and instant logout.",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["twistauth", "twistauth.*"])
    + ["twisted.plugins", "twistauth.demo_page"],
    # The demo page's files live in examples/demo and install with the package.
    package_dir={"twistauth.demo_page": "examples/demo"},
    package_data={
        "twistauth": ["py.typed"],
        "twistauth.demo_page": ["*.html", "*.css", "*.js", "*.svg"],
    },
    install_requires=[
        "twisted>=23.10",
        "klein>=23.5",
        "treq>=23.11",
        # 1.6: RedisFactory.startConnecting and its pool slots, which
        # twistauth._redislink builds on (Sentinel, fail-fast, AUTH retry).
        "txredisapi>=1.6",
        "attrs>=22.2",
        "zope.interface>=5",
        "msgpack>=1.0",
        "cryptography>=42",
        "argon2-cffi>=23.1",
        "PyJWT>=2.12",
        "PyYAML>=6",
        "hyperlink>=21",
        "service-identity>=21",
        "prometheus-client>=0.20",
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            "mypy>=1.8",
            "mypy-zope>=1.0",
            "ruff>=0.4",
            "sphinx>=7",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: Implementation :: CPython",
        "Programming Language :: Python :: Implementation :: PyPy",
    ],
)
