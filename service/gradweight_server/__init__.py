"""gradweight server.

OpenMP worker threads that spin while idle starve the next combine on a small CPU box (a 5 ms step was
measured at over 1 s), so the server asks for passive waiting unless the operator chose otherwise. This must
happen before torch loads OpenMP, hence here. A short spin (`GOMP_SPINCOUNT=10000`, about 0.1 ms) made a
large combine faster on an idle machine but 7x slower with another process busy on one of 2 cores, so it
is left to the operator (README, "Settings").
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
