package controlplane

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// File names inside the control plane's directory.
const (
	caCertFile     = "ca.crt"
	servingCert    = "apiserver.crt"
	servingKey     = "apiserver.key"
	saKeyFile      = "sa.key"
	saPubFile      = "sa.pub"
	tokenFile      = "tokens.csv"
	etcdDataDir    = "etcd"
	etcdLogFile    = "etcd.log"
	apiLogFile     = "kube-apiserver.log"
	apiCertDir     = "apiserver-certs"
	ownerFile      = "owner"
	certValidity   = 365 * 24 * time.Hour
	certBackdating = time.Hour
)

// writeCerts generates a CA, a serving certificate for 127.0.0.1/localhost (and the extra IPs)
// signed by it and the service-account signing key pair, writes them into dir and returns the
// CA certificate (PEM).
func writeCerts(dir string, extraIPs ...net.IP) ([]byte, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "meshcrypt-controlplane-ca"},
		NotBefore:             now.Add(-certBackdating),
		NotAfter:              now.Add(certValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate serving key: %w", err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-certBackdating),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  append([]net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}, extraIPs...),
		DNSNames: []string{
			"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create serving certificate: %w", err)
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate service-account key: %w", err)
	}

	caPEM := pemBlock("CERTIFICATE", caDER)
	files := []struct {
		name string
		data func() ([]byte, error)
	}{
		{caCertFile, func() ([]byte, error) { return caPEM, nil }},
		// The chain, so clients that trust only the CA verify the server.
		{servingCert, func() ([]byte, error) { return append(pemBlock("CERTIFICATE", srvDER), caPEM...), nil }},
		{servingKey, func() ([]byte, error) { return ecKeyPEM(srvKey) }},
		{saKeyFile, func() ([]byte, error) { return ecKeyPEM(saKey) }},
		{saPubFile, func() ([]byte, error) {
			der, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
			return pemBlock("PUBLIC KEY", der), err
		}},
	}
	for _, f := range files {
		b, err := f.data()
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", f.name, err)
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), b, 0o600); err != nil {
			return nil, fmt.Errorf("write %s: %w", f.name, err)
		}
	}
	return caPEM, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return n
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func ecKeyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pemBlock("EC PRIVATE KEY", der), nil
}

// randomToken returns 32 random bytes, hex encoded.
func randomToken() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return hex.EncodeToString(b)
}

// validUserName rejects names that would break the token file's CSV.
func validUserName(s string) error {
	if s == "" {
		return fmt.Errorf("empty user name")
	}
	if strings.ContainsAny(s, ",\"\n\r") {
		return fmt.Errorf("user name %q contains a comma, quote or newline", s)
	}
	return nil
}

// writeTokenFile writes the kube-apiserver static token file: token,user,uid,"group1,group2".
func writeTokenFile(path string, users []User, tokens map[string]string) error {
	var b strings.Builder
	for _, u := range users {
		for _, g := range u.Groups {
			if err := validUserName(g); err != nil {
				return fmt.Errorf("user %s: group: %w", u.Name, err)
			}
		}
		fmt.Fprintf(&b, "%s,%s,%s,\"%s\"\n", tokens[u.Name], u.Name, u.Name, strings.Join(u.Groups, ","))
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}
	return nil
}
