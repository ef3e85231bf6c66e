"""Environments for multi-turn rollouts: the protocol (``base``) and tool use (``tools``,
``tool_calls``, ``sandbox``, ``tool_env``)."""

from jaxrl_llm.envs.base import Environment, StepResult, check_step_result
from jaxrl_llm.envs.sandbox import Sandbox, ToolLoadError, ToolOutcome, ToolPickleError, shared_sandbox
from jaxrl_llm.envs.tool_calls import (
    ToolCall,
    ToolCallError,
    check_tool_call,
    format_tool_call,
    has_tool_call,
    parse_tool_calls,
    validate_arguments,
)
from jaxrl_llm.envs.tool_env import ToolEnvironment
from jaxrl_llm.envs.tools import Tool, ToolRegistry, ToolSchemaError, function_schema, make_tool, tool

__all__ = [
    "Environment", "StepResult", "check_step_result",
    "Sandbox", "ToolLoadError", "ToolOutcome", "ToolPickleError", "shared_sandbox",
    "ToolCall", "ToolCallError", "check_tool_call", "format_tool_call", "has_tool_call", "parse_tool_calls",
    "validate_arguments",
    "ToolEnvironment",
    "Tool", "ToolRegistry", "ToolSchemaError", "function_schema", "make_tool", "tool",
]
