"""Flower ClientApp of a participant: load the global adapter, train locally, reply with the delta.

Only the adapter delta and counts leave the participant; the records stay in its shard.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.adapter import adapter_vector, check_vector, load_adapter_vector
from fedlora.evaluate import evaluate
from fedlora.train import train_local
from fedlora.wire import read_instruction, reply_content
from participant.runtime import get_runtime

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = read_instruction(msg.content)
    cfg = instruction.config
    runtime = get_runtime(cfg, dict(context.node_config))
    check_vector(instruction.vector, runtime.layout.size, "global adapter")
    load_adapter_vector(runtime.loaded.model, instruction.vector, runtime.layout)
    result = train_local(
        runtime.loaded.model,
        runtime.loaded.tokenizer,
        runtime.shard.train,
        cfg.train,
        cfg.model.task,
        runtime.loaded.label_names,
        cfg.data.max_length,
        seed=cfg.federation.seed * 100_003 + instruction.server_round * 1_009 + runtime.partition_id,
    )
    trained, _ = adapter_vector(runtime.loaded.model)
    metrics = {
        "num-examples": len(runtime.shard.train),
        "train_loss": result.mean_loss,
        "partition_id": runtime.partition_id,
    }
    return Message(reply_content(metrics, trained - instruction.vector), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    instruction = read_instruction(msg.content)
    cfg = instruction.config
    runtime = get_runtime(cfg, dict(context.node_config))
    check_vector(instruction.vector, runtime.layout.size, "global adapter")
    load_adapter_vector(runtime.loaded.model, instruction.vector, runtime.layout)
    result = evaluate(
        runtime.loaded.model,
        runtime.loaded.tokenizer,
        runtime.shard.test,
        cfg.model.task,
        runtime.loaded.label_names,
        cfg.data.max_length,
    )
    metrics = {
        "num-examples": result.examples,
        "eval_loss": result.loss,
        "eval_accuracy": result.accuracy,
        "partition_id": runtime.partition_id,
    }
    return Message(reply_content(metrics), reply_to=msg)
