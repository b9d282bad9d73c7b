"""The paper's experiments end to end, behind reproduce.py: Table II, Table III and Fig. 4.

`protocol` (every run and setting, tagged paper or ours), `plan` (the runs and evaluations of
the chosen experiments), `runs` (training and evaluating them, resumably), `report` (our figures
beside the paper's) and `footprint` (the GPU memory and hours a run costs). Only
`m2cnn_tf.commands.reproduce` imports it.
"""
