"""An ordinary Flower app (its own model and training code) that gains compression by
adding the fedsqueeze mod and wrapping its strategy: nothing else changes.

README.md shows this file's code down to the line "end of the example" verbatim
(tests/integration/test_readme_example.py checks it); what follows that line only runs
it in a Flower simulation for the test suite.

Usage: python -m tests.integration.dropin_app   (prints one line per round)
"""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from coordinator.dropin import compressed
from edge.mod import fedsqueeze_mod


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def local_data(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(pid)
    x = torch.randn(256, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


# ---- the client: written the usual Flower way ------------------------------------
client = ClientApp(mods=[fedsqueeze_mod])  # <- the only fedsqueeze line on this side


@client.train()
def train(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    x, y = local_data(int(context.node_config["partition-id"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    metrics = MetricRecord({"num-examples": len(x), "train-loss": float(loss)})
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg
    )


# ---- the server ------------------------------------------------------------------
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    x, y = local_data(99)

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            return MetricRecord({"mse": float(torch.nn.functional.mse_loss(model(x), y))})

    with compressed(  # <- wraps any Flower strategy: model bytes go on the data plane
        FedAvg(fraction_evaluate=0.0), down_spec="int8", up_spec="topk10-int4"
    ) as strategy:
        result = strategy.start(
            grid,
            ArrayRecord(make_model().state_dict()),
            num_rounds=3,
            timeout=120,
            evaluate_fn=evaluate,
        )
    for rnd, metrics in sorted(result.evaluate_metrics_serverapp.items()):
        stats = strategy.stats.get(rnd)
        moved = f", {stats.bytes_down} B down, {stats.bytes_up} B up" if stats else ""
        accepted = f", {stats.accepted} updates" if stats else ""
        print(f"round {rnd}: mse {metrics['mse']:.6f}{moved}{accepted}", flush=True)


# ---- end of the example: the test suite runs it in a Flower simulation ------------
def _simulate() -> None:
    import warnings

    from simulations.engine import run_simulation
    from tests.subproc import arm_watchdog

    warnings.simplefilter("ignore")
    arm_watchdog()
    run_simulation(
        server,
        client,
        num_supernodes=2,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )


if __name__ == "__main__":
    _simulate()
