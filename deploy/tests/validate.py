"""Validates rendered Kubernetes manifests strictly, and prints them as one JSON array.

Reads the output of `kubectl kustomize` on standard input. Every built-in object is checked
against the Kubernetes OpenAPI schemas of each version given with --kubernetes (PyPI
kubernetes-validate, strict: an unknown field is an error); KEDA's objects against the
openAPIV3Schema of KEDA's own CRDs (deploy/tests/keda-crds/, from KEDA's release), made strict
the same way. Any other kind is an error: nothing is applied that was not checked.

Exit status 0 and the objects as JSON on standard output, or 1 and one line per problem on
standard error. The Rust tests (chatfleet/tests/deploy_manifests.rs) run this and check what
the objects mean.
"""

import argparse
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

CRD_DIR = pathlib.Path(__file__).resolve().parent / "keda-crds"


def strict(schema):
    """The schema with unknown properties refused wherever it lists properties, as the API
    server's strict field validation refuses them."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas():
    """(apiVersion, kind) -> the strict JSON schema of every KEDA CRD's served versions."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes", action="append", required=True, help="e.g. 1.30.0")
    args = parser.parse_args()
    crds = crd_schemas()
    objects = [o for o in yaml.safe_load_all(sys.stdin) if o is not None]
    problems = []
    for obj in objects:
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in crds:
            validator = jsonschema.Draft7Validator(crds[key])
            for error in validator.iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.append(f"{what}: {path}: {error.message}")
            continue
        if obj.get("apiVersion", "").startswith("keda.sh/"):
            problems.append(f"{what}: no KEDA CRD schema for {key}")
            continue
        for version in args.kubernetes:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{what} (Kubernetes {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{what} (Kubernetes {version}): no schema: {e}")
    if not objects:
        problems.append("no objects on standard input")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
