// Package api tests what meets the API server, against a real kube-apiserver: the generated
// CRDs (the schema and CEL rules must make the API server itself reject malformed objects),
// the agents' RBAC and admission policy (a node speaks only for itself), and the operator CLI
// (verdicts, exit codes, kubeconfig handling, and an error naming the verb and resource when
// RBAC refuses).
package api
