package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// The exit codes, documented in docs/operations.md: an audit job tells "not compliant" from
// "could not check".
const (
	// exitOK: the command did its work; status found the cluster compliant.
	exitOK = 0
	// exitVerdict: the command ran and printed a negative verdict (status: not compliant;
	// policy check: denied).
	exitVerdict = 1
	// exitError: the command could not run: bad input, no kubeconfig, API server unreachable,
	// missing permissions, a node or pod that does not exist.
	exitError = 2
)

// errVerdict makes the command exit with exitVerdict after printing its own verdict.
var errVerdict = errors.New("negative verdict")

// exitCode maps a command's error to the process's exit status.
func exitCode(err error) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errVerdict):
		return exitVerdict
	}
	return exitError
}

// forbiddenMessage is the API server's authorization failure message (kube-apiserver's
// responsewriters.forbiddenMessage), from which describe names the verb and resource.
var forbiddenMessage = regexp.MustCompile(`User "([^"]*)" cannot (\S+) resource "([^"]+)" in API group "([^"]*)" (?:in the namespace "([^"]*)"|at the cluster scope)`)

// describe turns an error into the message the user reads. The usual failures of talking to
// a cluster, whose raw form is a chain of Go errors, become one sentence that says what is
// wrong and what to do: the API server unreachable or untrusted (naming it), credentials
// refused, RBAC permission missing (naming the user, verb, resource and scope), the meshcrypt
// CRDs not installed. Anything else is the error's own text.
func describe(err error) string {
	var status apierrors.APIStatus
	if errors.As(err, &status) {
		switch {
		case apierrors.IsForbidden(err):
			if m := forbiddenMessage.FindStringSubmatch(status.Status().Message); m != nil {
				return rbacMessage(m[1], m[2], m[3], m[4], m[5])
			}
		case apierrors.IsUnauthorized(err):
			return "the API server rejected the credentials (401 Unauthorized): the token or client certificate " +
				"of the kubeconfig's user is wrong or has expired; log in again or pick another --context"
		}
	}
	if meta.IsNoMatchError(err) {
		return fmt.Sprintf("the cluster does not serve the %s API: the meshcrypt CRDs are not installed "+
			"(kubectl apply --server-side -f manifests/crds/, or install the Helm chart)", v1alpha1.GroupVersion)
	}
	if ae, ok := errors.AsType[*apiServerError](err); ok && !errors.Is(err, context.Canceled) {
		return unreachableMessage(ae.server, ae.err)
	}
	return err.Error()
}

// apiServerError is a request to the Kubernetes API server that got no HTTP response: the
// server is unreachable, or its TLS certificate untrusted. It tells such failures from those
// of other HTTP requests the CLI makes (to agents, say).
type apiServerError struct {
	server string
	err    error
}

func (e *apiServerError) Error() string { return e.err.Error() }
func (e *apiServerError) Unwrap() error { return e.err }

// apiServerTransport marks the transport errors of requests to the API server.
type apiServerTransport struct {
	server string
	next   http.RoundTripper
}

// RoundTrip implements http.RoundTripper.
func (t apiServerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(r)
	if err != nil {
		return nil, &apiServerError{server: t.server, err: err}
	}
	return resp, nil
}

// markAPIServerErrors makes cfg's requests fail with an apiServerError when they get no
// response, so describe can name the server.
func markAPIServerErrors(cfg *rest.Config) {
	server := cfg.Host
	if u, err := url.Parse(cfg.Host); err == nil && u.Host != "" {
		server = u.Scheme + "://" + u.Host
	}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return apiServerTransport{server: server, next: rt} })
}

// rbacMessage says which permission the user lacks, and the rule that grants it.
func rbacMessage(user, verb, resource, group, namespace string) string {
	full, sub, _ := strings.Cut(resource, "/")
	name := full
	if group != "" {
		name += "." + group
	}
	if sub != "" {
		name += "/" + sub
	}
	scope, binding := "cluster-wide", "a ClusterRole bound with a ClusterRoleBinding"
	if namespace != "" {
		scope = fmt.Sprintf("in namespace %q", namespace)
		binding = fmt.Sprintf("a Role in namespace %q, or a ClusterRole, bound to the user", namespace)
	}
	return fmt.Sprintf("not allowed: user %q may not %s %s (%s). It needs an RBAC rule with apiGroups [%q], resources [%q], verbs [%q] in %s",
		user, verb, name, scope, group, resource, verb, binding)
}

// unreachableMessage explains a failed HTTP request to the API server at server.
func unreachableMessage(server string, err error) string {
	if _, ok := errors.AsType[x509.UnknownAuthorityError](err); ok {
		return fmt.Sprintf("cannot verify the Kubernetes API server at %s: its certificate is not signed by the kubeconfig's certificate-authority (%v)", server, err)
	}
	if _, ok := errors.AsType[x509.HostnameError](err); ok {
		return fmt.Sprintf("cannot verify the Kubernetes API server at %s: %v", server, err)
	}
	reason := err.Error()
	if dns, ok := errors.AsType[*net.DNSError](err); ok {
		reason = fmt.Sprintf("cannot resolve %s", dns.Name)
		if dns.IsNotFound {
			reason += ": no such host"
		}
	} else if op, ok := errors.AsType[*net.OpError](err); ok {
		reason = op.Err.Error()
		if sc, ok := op.Err.(*os.SyscallError); ok {
			reason = sc.Err.Error()
		}
		if op.Timeout() {
			reason = "timed out"
		}
	} else if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		reason = "timed out"
	}
	return fmt.Sprintf("cannot reach the Kubernetes API server at %s: %s (is the cluster up, and is this the right kubeconfig and --context?)", server, reason)
}

// kubeconfigError explains why no client configuration could be loaded.
func kubeconfigError(cc clientcmd.ClientConfig, g *globals, err error) error {
	if g.kubeconfig != "" {
		if _, serr := os.Stat(g.kubeconfig); serr != nil {
			return fmt.Errorf("--kubeconfig %s: %w", g.kubeconfig, errors.Unwrap(serr))
		}
	}
	if clientcmd.IsEmptyConfig(err) {
		if env := os.Getenv(clientcmd.RecommendedConfigPathEnvVar); env != "" {
			return fmt.Errorf("no kubeconfig: $%s is %q, but none of its files exists", clientcmd.RecommendedConfigPathEnvVar, env)
		}
		return fmt.Errorf("no kubeconfig: pass --kubeconfig, set $%s, or create %s (and this is not a pod with a ServiceAccount)",
			clientcmd.RecommendedConfigPathEnvVar, clientcmd.RecommendedHomeFile)
	}
	if raw, rerr := cc.RawConfig(); rerr == nil && g.context != "" && raw.Contexts[g.context] == nil {
		names := make([]string, 0, len(raw.Contexts))
		for n := range raw.Contexts {
			names = append(names, n)
		}
		slices.Sort(names)
		return fmt.Errorf("load kubeconfig: --context %q: no such context (the kubeconfig has: %s)", g.context, strings.Join(names, ", "))
	}
	return fmt.Errorf("load kubeconfig: %w", err)
}
