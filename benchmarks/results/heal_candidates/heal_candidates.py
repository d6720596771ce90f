"""Does healing-aware selection change the demo's pick? pick_after_healing on the demo's search (k=4)."""
import json, sys, time
from pathlib import Path
from hwnas.heal_select import pick_after_healing
t = time.time()
r = pick_after_healing(source="smollm2-135m", search_dir=Path("/work/measure/runs/demo/search"), k=4,
                       tokens=140_000 // 8, work=Path("/work/main/.cache/hwnas/heal-candidates-demo"), progress=False)
print(json.dumps({"minutes": (time.time() - t) / 60, "changed_pick": r["changed_pick"],
                  "rows": [{"layers": len(c["config"]["layers"]), "mlp": c["config"]["mlp"],
                            "before": c["nll_before_healing"], "after": c["nll_after_healing"]} for c in r["candidates"]]}, indent=1))
