// Package api tests the generated CRDs against a real kube-apiserver: the schema and CEL
// rules must make the API server itself reject malformed objects.
package api
