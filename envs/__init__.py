"""Tool-use environments for ToolGRPO."""
