"""jaxrl_llm.rewards: reward functions in the TRL convention.

``reward_fn(prompts, completions, **columns) -> list[float | None]``, one value per
completion, None meaning "could not score". Rule/verifier rewards (math answers,
formats, synthetic arithmetic), combinators (weighted sums, a failure-safe wrapper) and
reward specs by name (``load_reward_fn``, ``build_reward``). See docs/rewards.md.
"""

from jaxrl_llm.rewards._utils import RewardFn, completion_text
from jaxrl_llm.rewards.arithmetic import (
    arithmetic_reward,
    make_arithmetic_dataset,
    make_arithmetic_reward,
    parse_integer_answer,
)
from jaxrl_llm.rewards.combine import (
    CombinedReward,
    RewardFailure,
    SafeRewardFn,
    combine_rewards,
    safe_reward_fn,
)
from jaxrl_llm.rewards.format import (
    THINK_ANSWER_PATTERN,
    THINK_ANSWER_TAGS,
    format_reward,
    tag_count_reward,
)
from jaxrl_llm.rewards.math import (
    extract_answer,
    extract_boxed,
    extract_tag,
    gold_answer,
    math_accuracy_reward,
    math_equal,
    normalize_answer,
)
from jaxrl_llm.rewards.registry import BUILTIN_REWARDS, build_reward, load_reward_fn

__all__ = [
    "RewardFn",
    "completion_text",
    "arithmetic_reward",
    "make_arithmetic_dataset",
    "make_arithmetic_reward",
    "parse_integer_answer",
    "CombinedReward",
    "RewardFailure",
    "SafeRewardFn",
    "combine_rewards",
    "safe_reward_fn",
    "THINK_ANSWER_PATTERN",
    "THINK_ANSWER_TAGS",
    "format_reward",
    "tag_count_reward",
    "extract_answer",
    "extract_boxed",
    "extract_tag",
    "gold_answer",
    "math_accuracy_reward",
    "math_equal",
    "normalize_answer",
    "BUILTIN_REWARDS",
    "build_reward",
    "load_reward_fn",
]
