"""Experiments on Flower's simulation engine: link profiles, budgets, sweeps, tables, plots.

One simulation (Ray starts once) runs every strategy of an experiment ("arm") one after
the other on the same virtual clients, the same partitions and the same sampling:

* :mod:`simulations.config` reads an experiment (defaults < TOML < ``--set`` flags);
* :mod:`simulations.baselines` names the arms (plain Flower FedAvg fp32, fp16, int8,
  top-k with error feedback, fedsqueeze adaptive);
* :mod:`simulations.links` and :mod:`simulations.clock` give clients links and rounds a
  simulated duration, with an optional deadline;
* :mod:`simulations.grid`, :mod:`simulations.client` and :mod:`simulations.server` run the
  arms (the coordinator and edge apps for fedsqueeze arms, Flower's own FedAvg for the
  baseline), counting every byte on the wire;
* :mod:`simulations.runner` ties it together and writes ``results.csv``, ``clients.csv``,
  ``summary.json``, ``summary.md``, ``run.json`` and the plots (:mod:`simulations.plots`).

The command line is ``fedsqueeze simulate`` (one arm) and ``fedsqueeze sweep`` (all arms,
optionally over several seeds).
"""
