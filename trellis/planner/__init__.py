"""The planner: lay a model onto a cluster, predict what it delivers, replay a workload through it.

model, hardware, calibration, machine -> what is planned and on what; layout, memory, cost ->
one layout's arithmetic; analytic, disagg -> closed forms for a replica; search -> every layout
ranked; simulator, replay -> the discrete-event check; report, explain, emit, validate, cli ->
what the operator sees (``trellis plan``).
"""
