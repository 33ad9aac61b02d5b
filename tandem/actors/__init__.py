"""The processes that compute: a lane's step loop, its verifier ranks and drafters (local,
remote, pools), the Ray actors that host them, and in-process generation."""
