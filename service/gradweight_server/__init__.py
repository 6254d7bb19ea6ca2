"""gradweight server.

OpenMP worker threads that spin while idle starve the next combine on a small CPU box (a 5 ms step was
measured at over 1 s with libgomp's default of about 3 ms of spinning), and workers that never spin pay a
wake-up at every parallel operation (a 50M combine took 140-200 ms that way against 95-100 ms): so the
server asks for passive waiting after a spin of about 0.1 ms (`GOMP_SPINCOUNT`, which libgomp honours over
the policy), unless the operator chose otherwise. This must happen before torch loads OpenMP, hence here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
