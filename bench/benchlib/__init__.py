"""
The benchmark harness behind ``python3 bench/run.py``.

``harness`` owns processes (start a server pinned to one core, wait until it
answers, read its CPU time, stop it) and the interleaved measurement loop;
``wrk`` owns the load generator; ``report`` owns the summary, the table and
the JSON file; ``scenarios`` holds one module per scenario (``echo`` today;
session caches and long-poll later), each naming its servers, its floor and
its driver.
"""
