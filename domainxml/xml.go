package domainxml

import (
	"encoding/xml"
	"errors"
	"fmt"

	"libvirt.org/go/libvirtxml"
)

// ParseDomain parses domain XML as KubeVirt hands it to a hook.
func ParseDomain(data []byte) (dom *libvirtxml.Domain, err error) {
	if len(data) == 0 {
		return nil, errors.New("parse domain XML: input is empty")
	}
	// libvirtxml's hand-written UnmarshalXML methods are not hardened
	// against arbitrary input; a panic there must become an error for the
	// one VM, not take down the hook server for every VM on the node.
	defer func() {
		if r := recover(); r != nil {
			dom, err = nil, fmt.Errorf("parse domain XML: malformed input: %v", r)
		}
	}()
	d := &libvirtxml.Domain{}
	if err := xml.Unmarshal(data, d); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	return d, nil
}

// MarshalDomain writes domain XML tab-indented, as KubeVirt does.
func MarshalDomain(dom *libvirtxml.Domain) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			out, err = nil, fmt.Errorf("marshal domain XML: %v", r)
		}
	}()
	b, err := xml.MarshalIndent(dom, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("marshal domain XML: %w", err)
	}
	return b, nil
}
