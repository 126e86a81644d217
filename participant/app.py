"""Flower ClientApp of a participant: load the global adapter, train locally, reply with the delta.

Only the adapter delta (in frozen-a mode: its lora_B part) and counts leave the participant;
the records stay in its shard.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.adapter import check_vector, load_adapter_vector
from fedlora.evaluate import evaluate
from fedlora.wire import read_instruction, reply_content
from participant import secure
from participant.runtime import get_runtime, train_round

app = ClientApp()
secure.register(app)  # query.secagg_<stage>: the secure-aggregation stages


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = read_instruction(msg.content)
    if instruction.config.secagg.enabled:  # a replayed round is refused before any training
        secure.refuse_replay(context, instruction.server_round, "a train request")
    runtime = get_runtime(instruction.config, dict(context.node_config), own_rank=True)
    upload, metrics = train_round(runtime, instruction.config, instruction.vector, instruction.server_round)
    if instruction.config.secagg.enabled:  # kept in context.state until masked (participant/secure.py)
        return secure.hold_update(msg, context, instruction.config, upload, metrics, instruction.server_round)
    return Message(reply_content(metrics, upload), reply_to=msg)


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
