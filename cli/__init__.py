"""The `peer` command: main.py (join, status, leave, identity, swarm), render.py (`peer status`
tables), swarm.py (`peer swarm`: a run seen from any machine, without a daemon)."""
