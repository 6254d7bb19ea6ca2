"""gradweight server.

OpenMP worker threads that spin while idle starve the next combine on a small CPU box (a 5 ms step was
measured at over 1 s), so the server asks for passive waiting unless the operator chose otherwise. This must
happen before torch loads OpenMP, hence here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
