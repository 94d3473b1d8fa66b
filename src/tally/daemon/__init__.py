"""The tally node daemon: MPS, one scoreboard per GPU, client liveness,
metrics. `tally up` / `tally down` / `tally status` drive it (cli.py);
`tally run` joins it through client.py."""
