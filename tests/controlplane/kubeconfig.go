package controlplane

import (
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// kubeconfigName names the cluster, user and context in generated kubeconfigs.
const kubeconfigName = "meshcrypt"

// Kubeconfig returns a kubeconfig (YAML) for server ("" means URL()) that trusts the control
// plane's CA and authenticates with token; its current context is "meshcrypt". Multi-cluster
// tests put it into the Secret a MeshConfig names for a remote cluster.
//
// A server other than URL() (a forwarder, say, that clients in another network namespace
// reach) need not be in the serving certificate: the kubeconfig then sets tls-server-name
// "localhost", which is.
func (cp *ControlPlane) Kubeconfig(server, token string) ([]byte, error) {
	cluster := &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: cp.CACert()}
	switch server {
	case "", cp.URL():
		cluster.Server = cp.URL()
	default:
		cluster.TLSServerName = "localhost"
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[kubeconfigName] = cluster
	cfg.AuthInfos[kubeconfigName] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts[kubeconfigName] = &clientcmdapi.Context{Cluster: kubeconfigName, AuthInfo: kubeconfigName}
	cfg.CurrentContext = kubeconfigName
	b, err := clientcmd.Write(*cfg)
	if err != nil {
		return nil, fmt.Errorf("encode kubeconfig: %w", err)
	}
	return b, nil
}

// WriteKubeconfig writes Kubeconfig(server, token) to path with mode 0600, replacing the file
// atomically. client-go's clientcmd and kubectl read it.
func (cp *ControlPlane) WriteKubeconfig(path, server, token string) error {
	b, err := cp.Kubeconfig(server, token)
	if err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".kubeconfig-*")
	if err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	defer os.Remove(f.Name()) // fails harmlessly after the rename
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}
