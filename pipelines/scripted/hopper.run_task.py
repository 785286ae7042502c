import asyncio

from ..kernel import InvalidArgument

MAX_DEVELOPERS = 5


@tool
async def run_task(self, task: str, developers: int = 2) -> dict:
    """Run a task with a team: a PM plans it, then developers each do a part; returns the conversation, the plan and every report."""
    if not task.strip():
        raise InvalidArgument("task is empty: say what the team is to do")
    if isinstance(developers, bool) or not 1 <= developers <= MAX_DEVELOPERS:
        raise InvalidArgument(f"developers must be a whole number from 1 to {MAX_DEVELOPERS}, not {developers!r}")
    plan = await self.spawn("pm", f"Plan this task in {developers} parts, one per line: {task}")
    if plan["state"] != "reported":
        return {"task": task, "conversation_id": plan["conversation_id"], "plan": plan, "reports": [], "done": False}
    # The developers work at once; the kernel holds them to the role's max_instances, the rest wait their turn.
    reports = await asyncio.gather(*(
        self.spawn("developer", f"Do part {n} of {developers} of this plan for the task {task!r}: {plan['report']}",
                   conversation_id=plan["conversation_id"])
        for n in range(1, developers + 1)
    ))
    return {
        "task": task,
        "conversation_id": plan["conversation_id"],
        "plan": plan,
        "reports": list(reports),
        "done": all(r["state"] == "reported" for r in reports),
    }
