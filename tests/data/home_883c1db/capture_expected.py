"""Run with the OLD release on PYTHONPATH: start a daemon on a scratch copy of
each home and record what it reports (job.list, proofs, payouts, earnings, status)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from p2pgpu.home import Home
from p2pgpu.node import call

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for name in sys.argv[3:]:
    scratch = Path("/tmp/fixture-work/scratch") / name
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(src / name, scratch)
    home = Home(scratch)
    gpus = src / f"gpus{name[-1]}.json"
    proc = subprocess.Popen([sys.executable, "-m", "p2pgpu.cli", "node", "run", "--home", str(scratch),
                             "--listen", "/ip4/127.0.0.1/tcp/0", "--gpus-from", str(gpus)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line = proc.stdout.readline()
    port = json.loads(home.control_path.read_text())["port"]
    tok = home.token()
    doc = {"peer_id": call(port, tok, "status")["peer_id"],
           "jobs": call(port, tok, "job.list"),
           "proofs": call(port, tok, "proofs"),
           "payouts": call(port, tok, "payouts"),
           "earnings": call(port, tok, "earnings")}
    proc.terminate(); proc.wait(10)
    (out / f"{name}.expected.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    print(name, doc["peer_id"], len(doc["jobs"]), len(doc["proofs"]), len(doc["payouts"]), len(doc["earnings"]))
