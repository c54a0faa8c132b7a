"""``python -m lowrank`` prints what was built and what can run here."""

from lowrank import info

for key, value in info().items():
    print(f"{key:20s} {value}")
