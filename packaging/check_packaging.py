#!/usr/bin/env python3
"""Cross-checks of claimgate's packaging files that no off-the-shelf linter makes.

Run by scripts/check-packaging.sh (python3 with PyYAML; tomllib needs Python >= 3.11).
Each check prints `ok   <what>` or `FAIL <what>: <why>`; the exit status is 1 if any
failed. The files are read as they are in the repository; docker-compose.yml is
interpolated with the defaults it names (`${VAR:-default}`), as `docker compose` would
with none of its variables set.

What is checked, and why each matters:
- docker-compose.yml: the five services exist and each has a health check; the gateway
  waits for healthy Redis and PostgreSQL; every bind-mounted file exists; named volumes
  are declared; the gateway's --config is a file the image ships; its stop grace is longer
  than the config's shutdown grace; its port, health check and the Dockerfile agree with
  the config's listen port; Redis keeps an AOF and never evicts (DESIGN.md invariant 4).
- Prometheus (compose): scrapes the gateway service on its container port at /metrics.
- Grafana (compose): the provisioning files use no environment variable; the data source
  URL names a compose service; each dashboard provider's path is a mounted folder that
  holds grafana/dashboards/claimgate.json; the home dashboard path resolves too.
- Dockerfile: every COPY source exists and is let through by .dockerignore; cargo builds
  are --locked; the runtime stage runs as a non-root user, has a HEALTHCHECK and EXPOSE.
- systemd unit: ExecStart reads /etc/claimgate/claimgate.toml; TimeoutStopSec is longer
  than the shutdown grace.
- LICENSE is the Apache License 2.0 that Cargo.toml declares.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path, PurePosixPath

try:
    import yaml
except ImportError:  # pragma: no cover - reported by the shell script
    print("SKIP cross-checks: python3 has no PyYAML (pip install pyyaml)")
    sys.exit(0)

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
ROOT = Path(ARGS[0] if ARGS else ".").resolve()
failures: list[str] = []
QUIET = "--gateway-env" in sys.argv


def check(what: str, ok: bool, why: str = "") -> bool:
    if QUIET:
        pass
    elif ok:
        print(f"ok   {what}")
    else:
        print(f"FAIL {what}: {why}")
        failures.append(what)
    return ok


def interpolate(text: str) -> str:
    """`${VAR:-default}`/`${VAR-default}`/`${VAR}` with every VAR unset, `$$` -> `$`."""

    def sub(m: re.Match[str]) -> str:
        body = m.group(1)
        for sep in (":-", "-"):
            if sep in body:
                return body.split(sep, 1)[1]
        return ""

    return re.sub(r"\$\{([^}]*)\}", sub, text).replace("$$", "$")


def duration_s(value: object) -> float:
    """Compose/systemd durations: `15s`, `1m30s`, `500ms`, or a bare number of seconds."""
    s = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)", s):
        if m.start() != pos and s[pos : m.start()].strip():
            raise ValueError(f"bad duration {s!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"bad duration {s!r}")
    return total


def uses_env(text: str) -> list[str]:
    """Environment references Grafana would expand in a provisioning file ($VAR, ${VAR})."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return re.findall(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", body.replace("$$", ""))


def port_of_listen(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------
# Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if cur and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """The allow-list form of .dockerignore this repository uses: `*`, then `!entry`."""
    allowed = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.strip("/")
        hit = pat == "*" or path == pat or path.startswith(pat + "/")
        if hit:
            allowed = neg
    return allowed


dockerfile = (ROOT / "Dockerfile").read_text()
instr = dockerfile_instructions(dockerfile)
ignore = [
    ln.strip()
    for ln in (ROOT / ".dockerignore").read_text().splitlines()
    if ln.strip() and not ln.strip().startswith("#")
]
check(".dockerignore is an allow list (first pattern `*`)", ignore[:1] == ["*"], f"starts {ignore[:1]}")

stages: list[list[tuple[str, str]]] = []
image_configs: dict[str, Path] = {}  # path in the image -> file in the repository
for word, args in instr:
    if word == "FROM":
        stages.append([])
    if stages:
        stages[-1].append((word, args))
    if word == "COPY":
        parts = [a for a in shlex.split(args) if not a.startswith("--")]
        if any(a.startswith("--from") for a in shlex.split(args)):
            continue
        *srcs, dest = parts
        for src in srcs:
            ok_exists = (ROOT / src).exists()
            check(f"Dockerfile COPY {src}: exists", ok_exists, "no such file in the repository")
            check(
                f"Dockerfile COPY {src}: let through by .dockerignore",
                dockerignore_allows(ignore, src.strip("/")),
                "excluded from the build context",
            )
            if dest.startswith("/etc/claimgate") and dest.endswith("/") and src.endswith(".toml"):
                image_configs[str(PurePosixPath(dest) / Path(src).name)] = ROOT / src

runs = [a for w, a in instr if w == "RUN" and "cargo build" in a]
check("Dockerfile: cargo build runs", bool(runs), "no RUN cargo build")
for r in runs:
    for seg in re.split(r"&&|;", r):
        if "cargo build" in seg:
            check(f"Dockerfile: `{seg.strip()[:60]}` is --locked", "--locked" in seg, "missing --locked")
final = stages[-1] if stages else []
users = [a for w, a in final if w == "USER"]
check(
    "Dockerfile: the runtime stage runs as a non-root user",
    bool(users) and users[-1].split(":")[0] not in ("root", "0"),
    f"USER {users[-1] if users else '(none)'}",
)
health = [a for w, a in final if w == "HEALTHCHECK"]
check("Dockerfile: HEALTHCHECK in the runtime stage", bool(health), "none")
exposed = {int(p.split("/")[0]) for w, a in final if w == "EXPOSE" for p in a.split()}
check("Dockerfile: EXPOSE in the runtime stage", bool(exposed), "none")
default_cfg = next(
    (m.group(1) for w, a in final if w == "ENV" for m in [re.search(r"CLAIMGATE_CONFIG=(\S+)", a)] if m),
    None,
)
check(
    "Dockerfile: CLAIMGATE_CONFIG names a config the image ships",
    default_cfg in image_configs,
    f"{default_cfg} not among {sorted(image_configs)}",
)
health_port = None
if health:
    m = re.search(r"https?://[^/:\s\"]+:(\d+)/", health[-1])
    health_port = int(m.group(1)) if m else None
for image_path, repo_file in sorted(image_configs.items()):
    cfg = tomllib.loads(repo_file.read_text())
    port = port_of_listen(cfg.get("server", {}).get("listen", "127.0.0.1:8080"))
    listen = cfg.get("server", {}).get("listen", "")
    check(
        f"{repo_file.relative_to(ROOT)}: listens on every interface of the container",
        listen.startswith("0.0.0.0:") or listen.startswith("[::]:"),
        f"server.listen = {listen!r}",
    )
    check(
        f"{repo_file.relative_to(ROOT)}: port {port} is EXPOSEd and health-checked",
        port in exposed and health_port == port,
        f"EXPOSE {sorted(exposed)}, HEALTHCHECK port {health_port}",
    )
    for key, val in (("embedded.aof_path", cfg.get("embedded", {}).get("aof_path")),
                     ("database.url", cfg.get("database", {}).get("url"))):
        if cfg.get("backend") == "embedded" and val:
            path = re.sub(r"^sqlite://", "", val).split("?")[0]
            check(
                f"{repo_file.relative_to(ROOT)}: {key} is in the volume /var/lib/claimgate",
                path.startswith("/var/lib/claimgate/"),
                f"{val!r}",
            )

# ---------------------------------------------------------------------------------------
# docker-compose.yml

compose = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text()))
services = compose.get("services", {})
for name in ("gateway", "redis", "postgres", "prometheus", "grafana"):
    check(f"compose: service {name}", name in services, "missing")
for name, svc in services.items():
    hc = svc.get("healthcheck") or {}
    check(f"compose: {name} has a health check", bool(hc.get("test")) and not hc.get("disable"), "none")


def mounts(svc: dict) -> list[tuple[str, str, str]]:
    """(type, source, target) of each volume entry, short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, _, rest = v.partition(":")
            target = rest.split(":")[0]
            kind = "bind" if src.startswith((".", "/")) else "volume"
            out.append((kind, src, target))
        else:
            out.append((v.get("type", "volume"), v.get("source", ""), v.get("target", "")))
    return out


declared = set((compose.get("volumes") or {}).keys())
for name, svc in services.items():
    for kind, src, target in mounts(svc):
        if kind == "bind":
            check(f"compose: {name} mounts {src}: exists", (ROOT / src).exists(), "no such path")
        elif kind == "volume":
            check(f"compose: {name} volume {src} is declared", src in declared, "not under volumes:")


def host_path(svc: dict, container_path: str) -> Path | None:
    """The repository path that a container path of `svc` shows, through its bind mounts."""
    best = None
    for kind, src, target in mounts(svc):
        t = target.rstrip("/")
        if kind == "bind" and (container_path == t or container_path.startswith(t + "/")):
            if best is None or len(t) > len(best[1]):
                best = (src, t)
    if best is None:
        return None
    return (ROOT / best[0] / container_path[len(best[1]) :].lstrip("/")).resolve()


gw = services.get("gateway", {})
if "--gateway-env" in sys.argv:
    # For scripts/check-packaging.sh: the repository file behind the gateway's --config,
    # then its environment, one KEY=VALUE a line (what `claimgate check-config` is run with).
    c = list(gw.get("command", []))
    c = shlex.split(c) if isinstance(c, str) else c
    p = c[c.index("--config") + 1] if "--config" in c else default_cfg
    print(image_configs[p].relative_to(ROOT) if p in image_configs else "")
    env = gw.get("environment") or {}
    items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
    for k, v in items:
        print(f"{k}={v}")
    sys.exit(0)
deps = gw.get("depends_on", {})
for dep in ("redis", "postgres"):
    cond = deps.get(dep, {}).get("condition") if isinstance(deps, dict) else None
    check(f"compose: gateway waits for a healthy {dep}", cond == "service_healthy", f"condition {cond}")
gdeps = services.get("grafana", {}).get("depends_on", {})
check(
    "compose: grafana waits for a healthy prometheus",
    isinstance(gdeps, dict) and gdeps.get("prometheus", {}).get("condition") == "service_healthy",
    f"{gdeps}",
)

cmd = gw.get("command", [])
cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
cfg_path = cmd[cmd.index("--config") + 1] if "--config" in cmd else default_cfg
check(
    f"compose: gateway --config {cfg_path} is shipped in the image",
    cfg_path in image_configs,
    f"the Dockerfile copies {sorted(image_configs)}",
)
gw_cfg = tomllib.loads(image_configs[cfg_path].read_text()) if cfg_path in image_configs else {}
check("compose: the gateway runs the redis backend", gw_cfg.get("backend") == "redis" or
      gw.get("environment", {}).get("CLAIMGATE_BACKEND") == "redis", f"backend {gw_cfg.get('backend')}")
grace_ms = gw_cfg.get("server", {}).get("shutdown_grace_ms", 10000)
stop = duration_s(gw.get("stop_grace_period", "10s"))
check(
    f"compose: gateway stop_grace_period {stop:g}s > server.shutdown_grace_ms {grace_ms} ms",
    stop * 1000 > grace_ms,
    "Docker would SIGKILL the drain",
)
gw_port = port_of_listen(gw_cfg.get("server", {}).get("listen", "127.0.0.1:8080")) if gw_cfg else 8080
targets = []
for p in gw.get("ports", []):
    targets.append(int(str(p).rsplit(":", 1)[-1].split("/")[0]) if not isinstance(p, dict) else int(p["target"]))
check(f"compose: gateway publishes its port {gw_port}", gw_port in targets, f"ports {targets}")
hc_text = " ".join(map(str, (gw.get("healthcheck") or {}).get("test", [])))
check(f"compose: gateway health check probes port {gw_port}", f":{gw_port}/" in hc_text, hc_text)

rcmd = services.get("redis", {}).get("command", [])
rcmd = " ".join(rcmd) if isinstance(rcmd, list) else str(rcmd)
check("compose: redis keeps an append-only file", re.search(r"--appendonly\s+yes", rcmd) is not None, rcmd)
check("compose: redis never evicts", re.search(r"--maxmemory-policy\s+noeviction", rcmd) is not None, rcmd)
redis_vol = [t for k, s, t in mounts(services.get("redis", {})) if t == "/data"]
check("compose: redis /data is on a volume", bool(redis_vol), "no volume at /data")
pg_vol = [t for k, s, t in mounts(services.get("postgres", {})) if t.startswith("/var/lib/postgresql")]
check("compose: postgres data is on a volume", bool(pg_vol), "no volume under /var/lib/postgresql")

# Prometheus
prom = services.get("prometheus", {})
pcmd = " ".join(map(str, prom.get("command", [])))
m = re.search(r"--config\.file=(\S+)", pcmd)
prom_cfg_path = host_path(prom, m.group(1) if m else "/etc/prometheus/prometheus.yml")
if check("compose: prometheus config is mounted from the repository", prom_cfg_path is not None and prom_cfg_path.exists(), f"{prom_cfg_path}"):
    pcfg = yaml.safe_load(prom_cfg_path.read_text())
    jobs = [j for j in pcfg.get("scrape_configs", []) if j.get("job_name") == "claimgate"]
    scraped = False
    for j in jobs:
        for sd in j.get("dns_sd_configs", []):
            scraped |= "gateway" in sd.get("names", []) and int(sd.get("port", 0)) == gw_port
        for sc in j.get("static_configs", []):
            scraped |= f"gateway:{gw_port}" in sc.get("targets", [])
        check("prometheus (compose): job claimgate scrapes /metrics", j.get("metrics_path", "/metrics") == "/metrics", j.get("metrics_path"))
    check(f"prometheus (compose): job claimgate scrapes gateway:{gw_port}", scraped, f"{jobs}")

# Grafana
graf = services.get("grafana", {})
ds_dir = host_path(graf, "/etc/grafana/provisioning/datasources")
db_dir = host_path(graf, "/etc/grafana/provisioning/dashboards")
check("compose: grafana datasource provisioning is grafana/provisioning/datasources",
      ds_dir == (ROOT / "grafana/provisioning/datasources").resolve(), f"{ds_dir}")
check("compose: grafana dashboard provisioning is grafana/provisioning/dashboards",
      db_dir == (ROOT / "grafana/provisioning/dashboards").resolve(), f"{db_dir}")
for f in sorted((ROOT / "grafana/provisioning").rglob("*.y*ml")):
    refs = uses_env(f.read_text())
    check(f"{f.relative_to(ROOT)}: reads no environment variable", not refs, f"{refs}")
for f in sorted((ROOT / "grafana/provisioning/datasources").glob("*.y*ml")):
    for ds in yaml.safe_load(f.read_text()).get("datasources", []):
        url = ds.get("url", "")
        mm = re.match(r"https?://([^:/]+)", url)
        check(f"{f.relative_to(ROOT)}: {ds.get('name')} URL {url} is a compose service",
              bool(mm) and mm.group(1) in services, "no such service")
for f in sorted((ROOT / "grafana/provisioning/dashboards").glob("*.y*ml")):
    for prov in yaml.safe_load(f.read_text()).get("providers", []):
        path = prov.get("options", {}).get("path", "")
        hp = host_path(graf, path)
        check(
            f"{f.relative_to(ROOT)}: provider {prov.get('name')} path {path} holds grafana/dashboards/claimgate.json",
            hp is not None and (hp / "claimgate.json").resolve() == (ROOT / "grafana/dashboards/claimgate.json").resolve()
            and (hp / "claimgate.json").exists(),
            f"maps to {hp}",
        )
home = (graf.get("environment") or {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
if home:
    hp = host_path(graf, home)
    check(f"compose: grafana home dashboard {home} is mounted", hp is not None and hp.exists(), f"maps to {hp}")

# ---------------------------------------------------------------------------------------
# systemd unit

unit = (ROOT / "packaging/systemd/claimgate.service").read_text()
keys: dict[str, list[str]] = {}
for line in unit.splitlines():
    if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
        k, v = line.split("=", 1)
        keys.setdefault(k.strip(), []).append(v.strip())
execstart = " ".join(keys.get("ExecStart", []))
check("systemd: ExecStart reads /etc/claimgate/claimgate.toml", "--config /etc/claimgate/claimgate.toml" in execstart, execstart)
stop_s = duration_s(keys.get("TimeoutStopSec", ["90s"])[-1])
check(f"systemd: TimeoutStopSec {stop_s:g}s > the default shutdown grace (10 s)", stop_s > 10, "SIGKILL during the drain")
check("systemd: Restart=on-failure", keys.get("Restart", [""])[-1] == "on-failure", str(keys.get("Restart")))
for k in ("NoNewPrivileges", "ProtectSystem", "StateDirectory"):
    check(f"systemd: {k} set", k in keys, "missing")

# ---------------------------------------------------------------------------------------
# LICENSE

lic = (ROOT / "LICENSE").read_text()
cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
check("Cargo.toml: license = Apache-2.0", cargo.get("package", {}).get("license") == "Apache-2.0", "")
check(
    "LICENSE: the Apache License 2.0, complete",
    "Apache License" in lic[:200] and "Version 2.0, January 2004" in lic[:300]
    and "END OF TERMS AND CONDITIONS" in lic and "9. Accepting Warranty or Additional Liability" in lic,
    "not the full text",
)
ref = Path("/usr/share/common-licenses/Apache-2.0")
if ref.exists():
    check("LICENSE: identical to /usr/share/common-licenses/Apache-2.0", lic == ref.read_text(), "differs")

print(f"cross-checks: {len(failures)} failed")
sys.exit(1 if failures else 0)
