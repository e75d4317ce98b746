"""Write the small CRD schemas that tests/unit/test_deploy_manifests.py validates against.

The CRDs of KServe (ClusterServingRuntime 200 KB, InferenceService 2 MB) and of the Prometheus
Operator (PodMonitor 74 KB) are mostly descriptions and fields these manifests never use. This
keeps, from each version's openAPIV3Schema, every field name at every level the manifests reach
(so a misspelt field is an error: the API server would drop it silently) with its full schema
along the paths the manifests use, and only the type of the fields they do not use. Descriptions
and CEL rules (x-kubernetes-validations) are dropped. Run it again after a manifest starts using
a field: that field's subtree is then kept too.

    python tests/unit/deploy_schemas/trim_crd.py CRD.yaml [CRD.yaml ...]

with the CRD files of the release you target (KServe: charts/kserve-crd/templates/; Prometheus
Operator: example/prometheus-operator-crd-full/). Writes KIND-GROUP-VERSION.json here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MANIFESTS = [*sorted((ROOT / "deploy" / "kserve").glob("*.yaml")),
             *sorted((ROOT / "deploy" / "kubernetes").rglob("*.yaml"))]
KEEP = ("type", "format", "enum", "required", "pattern", "minimum", "maximum", "minLength", "maxLength",
        "minItems", "maxItems", "nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
        "anyOf", "oneOf", "allOf")


def trim(schema: dict, used: list) -> dict:
    """``schema`` cut down to what the values in ``used`` (the manifests' values at this place) reach."""
    out = {k: schema[k] for k in KEEP if k in schema}
    for k in ("anyOf", "oneOf", "allOf"):  # int-or-string and the like: small, kept without descriptions
        if k in out:
            out[k] = [_bare(s) for s in out[k]]
    if "properties" in schema:
        dicts = [u for u in used if isinstance(u, dict)]
        out["properties"] = {name: trim(sub, [d[name] for d in dicts if name in d]) if any(name in d for d in dicts)
                             else _bare(sub, shallow=True)
                             for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # an unknown field: the API server would prune it
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = trim(extra, [v for u in used if isinstance(u, dict) for v in u.values()])
    elif extra is not None:
        out["additionalProperties"] = extra
    if isinstance(schema.get("items"), dict):
        out["items"] = trim(schema["items"], [i for u in used if isinstance(u, list) for i in u])
    return out


def _bare(schema: dict, shallow: bool = False) -> dict:
    if shallow:
        return {k: schema[k] for k in ("type", "x-kubernetes-int-or-string") if k in schema}
    return {k: v for k, v in schema.items() if k in KEEP}


def main(paths: list[str]) -> int:
    docs = [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            used = [d for d in docs if d.get("kind") == kind and d.get("apiVersion") == f"{group}/{version['name']}"]
            if not used:
                continue
            schema = trim(version["schema"]["openAPIV3Schema"], used)
            schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the test itself
            out = HERE / f"{kind.lower()}-{group.split('.')[0]}-{version['name']}.json"
            out.write_text(json.dumps({"$comment": f"trimmed from the {crd['metadata']['name']} CRD by trim_crd.py",
                                       **schema}, indent=1, sort_keys=True) + "\n")
            print(f"{out.name}: {out.stat().st_size} bytes, from {len(used)} manifest(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
