"""A GPTModel's output layer as the losses use it: its final-norm hidden states (GPTModel's `output_processor`
hook, instead of logits) and the weight its output layer applies; the losses form the logits chunk by chunk
(megatron_opd.loss.fused, loss.LinearHead)."""


def output_weight(model):
    """The output layer's weight on the last stage, as megatron's GPTModel applies it: the embedding for a
    tied model, else the output layer's own (`shared_embedding_or_output_weight()` returns the embedding on
    any stage that has one, tied or not)."""
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight


def final_hidden_states(hidden_states, output_layer, config, **_):
    """GPTModel's `output_processor`: the final-norm hidden states [b, s, H] instead of the logits, entering
    the vocabulary-parallel loss as they would enter megatron's column-parallel output layer — gathered along
    the sequence under sequence parallelism (its gradient reduce-scattered), else copied into the TP region
    (its gradient, each rank's vocabulary shard's part, all-reduced)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    group = output_layer.tp_group
    if config.sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True, group=group)
    elif group.size() > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    return hidden_states.transpose(0, 1)
