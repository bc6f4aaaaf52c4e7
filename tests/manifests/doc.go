// Package manifests tests what installs and operates meshcrypt, without a cluster of nodes:
//
//   - the Helm chart (manifests/helm/meshcrypt), rendered with Helm's own engine (the Helm Go
//     SDK, so sprig, fail, include and values.schema.json behave exactly as under `helm
//     install`): a golden file pins the default render, every value is exercised, invalid
//     values fail with a clear message;
//   - the plain install (manifests/install/meshcrypt.yaml), generated from the chart;
//   - that every rendered object and every plain manifest is accepted by a real
//     kube-apiserver (server-side dry run, strict field validation), and that the chart's
//     RBAC, admission policy and CRDs are the ones in manifests/;
//   - the Dockerfile's sources, packages and entrypoint; the Grafana dashboard's metric names
//     (taken from pkg/metrics's registry); and every agent flag the chart passes (run with
//     --help against the real binary). The docs' command lines are checked in tests/docs.
//
// Regenerate the golden files (testdata/*.golden.yaml and manifests/install/meshcrypt.yaml)
// with `go test ./tests/manifests -update`.
package manifests
