from sglab.srt.distributed.communication_op import (  # noqa: F401
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from sglab.srt.distributed.parallel_state import (  # noqa: F401
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
)
