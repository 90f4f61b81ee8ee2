package store

import (
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Format writes an empty store over the whole disk.
func Format(d Disk, fo FormatOptions, o Options) error {
	geo, err := computeGeometry(d.Size(), fo)
	if err != nil {
		return err
	}
	s := newStore(d, o, geo)
	blob := encodeCheckpoint(0, 1, nil)
	buf := alignedBuf(blockSize)
	copy(buf, blob)
	for a := range ckptAreas {
		if err := s.writeSync(geo.CkptOff[a], buf); err != nil {
			return fmt.Errorf("format: write checkpoint area %d: %w", a, err)
		}
	}
	// Zero both journal rings so nothing of an earlier store on this device
	// can be mistaken for an entry.
	zeros := alignedBuf(int(roundUp(uint64(geo.JournalSlots)*sectorSize, blockSize)))
	if err := s.writeSync(geo.HeaderOff, zeros); err != nil {
		return fmt.Errorf("format: write journal headers: %w", err)
	}
	zb := alignedBuf(blockSize)
	for c := range 2 {
		for i := range uint64(geo.JournalSlots) {
			if err := s.writeSync(geo.bodyOffset(c, i), zb); err != nil {
				return fmt.Errorf("format: write journal body %d copy %d: %w", i, c, err)
			}
		}
	}
	if err := s.flushSync(); err != nil {
		return fmt.Errorf("format: flush: %w", err)
	}
	sb := superblock{Sequence: 1, Geo: geo, UUID: fo.UUID}
	if sb.UUID == ([16]byte{}) {
		if _, err := rand.Read(sb.UUID[:]); err != nil {
			return err
		}
	}
	ref := ckptRef{Seq: 0, Size: uint64(len(blob)), Sum: checksum(blob)}
	sb.Current, sb.Previous = ref, ref
	sb.Previous.Area = 1
	if err := s.wait(func(done func(error)) { s.writeSuperblock(sb, done) }); err != nil {
		return fmt.Errorf("format: %w", err)
	}
	return nil
}

// Open recovers a store: it picks the superblock by quorum, loads the newest
// valid checkpoint, replays the journal and repairs what the redundancy
// allows. It refuses, naming the location, when committed metadata is lost.
func Open(d Disk, o Options) (*Store, error) {
	start := time.Now()
	sb, repairSuper, err := readSuperblock(d, o)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	s := newStore(d, o, sb.Geo)
	s.uuid = sb.UUID
	s.c.sb = *sb
	from, fellBack, err := s.loadCheckpoint(sb)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	next, err := s.replay(from, sb)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	s.c.nextSeq = next
	s.c.durableSeq.Store(next - 1)
	var intentFrees blockSink
	if o.Intent != nil {
		if len(o.Intent.Mem) < MinIntentSize || len(o.Intent.Boot) > ihBootMax {
			return nil, fmt.Errorf("open store: intent log of %d bytes for boot %q: need at least %d bytes and a boot id of at most %d bytes", len(o.Intent.Mem), o.Intent.Boot, MinIntentSize, ihBootMax)
		}
		intentFrees = s.replayIntent(o.Intent)
	}
	s.initFree()
	// Blocks the replayed records freed stay allocated until a commit has
	// journaled those records, as on the live path.
	for _, p := range intentFrees {
		s.free[p/64].Or(1 << (p % 64))
		s.freeCount.Add(-1)
	}
	s.admin.frees = append(s.admin.frees, intentFrees...)
	if repairSuper != "" || fellBack {
		nsb := *sb
		nsb.Sequence++
		nsb.Parent = sb.sum()
		if fellBack {
			// Point both references at the good checkpoint so the next
			// checkpoint overwrites the corrupt area, not the good one.
			nsb.Current = sb.Previous
			repairSuper = "current checkpoint replaced by the previous one"
		}
		if err := s.wait(func(done func(error)) { s.writeSuperblock(nsb, done) }); err != nil {
			return nil, fmt.Errorf("open store: repair superblock: %w", err)
		}
		s.c.sb = nsb
		s.note("superblock: %s; rewrote all copies", repairSuper)
	}
	if o.Intent != nil {
		// Journal what the intent log gave back before wiping it for this
		// process; a crash before this Sync finds it intact again.
		if len(s.admin.recs) > 0 {
			if err := s.Sync(); err != nil {
				return nil, fmt.Errorf("open store: commit replayed intent log: %w", err)
			}
		}
		s.in.attach(o.Intent.Mem, s.uuid, o.Intent.Boot, s.c.durableSeq.Load())
	}
	s.log.Info("store opened", "volumes", len(s.table().byID), "journal_seq", next-1,
		"checkpoint_seq", from, "elapsed", time.Since(start))
	if o.Pump == nil {
		s.tickStop, s.tickDone = make(chan struct{}), make(chan struct{})
		go s.ticker()
	}
	return s, nil
}

// ticker commits queued records and reclaims blocks every 50 ms, so
// unflushed writes become durable without a guest FLUSH too.
func (s *Store) ticker() {
	defer close(s.tickDone)
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-s.tickStop:
			return
		case <-t.C:
			s.Tick()
		}
	}
}

// Close commits everything queued and stops the store.
func (s *Store) Close() error {
	if s.closed.Load() {
		return nil
	}
	for _, v := range s.table().byID {
		if v.queues.Load() != 0 {
			return fmt.Errorf("close store: volume %q still has open queues", v.name)
		}
	}
	if s.tickStop != nil {
		close(s.tickStop)
		<-s.tickDone
		s.tickStop = nil
	}
	err := s.Sync()
	s.closed.Store(true)
	return err
}

// abandon stops the store without syncing, as a crash would (tests).
func (s *Store) abandon() {
	if s.tickStop != nil {
		close(s.tickStop)
		<-s.tickDone
		s.tickStop = nil
	}
	s.closed.Store(true)
}

// Sync makes every completed operation durable and returns once the
// commit that did it has finished its checkpoint too.
func (s *Store) Sync() error {
	if err := s.wait(s.flush); err != nil {
		return err
	}
	return s.wait(s.whenIdle)
}

func readSuperblock(d Disk, o Options) (*superblock, string, error) {
	var copies [superCopies]*superblock
	var why [superCopies]string
	for i := range superCopies {
		buf := alignedBuf(blockSize)
		err := waitIO(o.Pump, func(done func(error)) { d.Read(uint64(i)*blockSize, buf, done) })
		if err != nil {
			why[i] = err.Error()
			continue
		}
		sb, err := decodeSuperblock(buf)
		switch {
		case err != nil:
			why[i] = err.Error()
		case int(sb.Copy) != i:
			why[i] = fmt.Sprintf("holds copy %d (misdirected write)", sb.Copy)
		case sb.Geo.DiskSize > d.Size():
			why[i] = fmt.Sprintf("describes a %d-byte store but the disk has %d bytes", sb.Geo.DiskSize, d.Size())
		default:
			copies[i] = sb
		}
	}
	var best *superblock
	votes := 0
	for i, c := range copies {
		if c == nil {
			continue
		}
		n := 0
		for _, o := range copies {
			if o != nil && o.sum() == c.sum() {
				n++
			}
		}
		if n >= superQuorum && (best == nil || c.Sequence > best.Sequence) {
			best, votes = copies[i], n
		}
	}
	if best == nil {
		var b strings.Builder
		for i := range superCopies {
			state := why[i]
			if state == "" {
				state = fmt.Sprintf("sequence %d, no other copy agrees", copies[i].Sequence)
			}
			fmt.Fprintf(&b, "; copy %d at offset %d: %s", i, i*blockSize, state)
		}
		return nil, "", fmt.Errorf("no superblock quorum (need %d of %d identical copies)%s: %w", superQuorum, superCopies, b.String(), ErrCorrupt)
	}
	var bad []string
	for i, c := range copies {
		if c == nil || c.sum() != best.sum() {
			state := why[i]
			if state == "" {
				state = fmt.Sprintf("stale sequence %d", c.Sequence)
			}
			bad = append(bad, fmt.Sprintf("copy %d at offset %d: %s", i, i*blockSize, state))
		}
	}
	_ = votes
	return best, strings.Join(bad, "; "), nil
}

// loadCheckpoint loads the current checkpoint, or the previous one when the
// current fails verification and fallback is allowed. It returns the
// sequence to replay the journal after.
func (s *Store) loadCheckpoint(sb *superblock) (uint64, bool, error) {
	d, errCur := s.readCheckpoint(sb.Current)
	ref := sb.Current
	if errCur != nil {
		if sb.Current.Flags&ckptNoFallback != 0 {
			return 0, false, fmt.Errorf("current checkpoint: %w (no fallback: the journal no longer covers the previous checkpoint): %w", errCur, ErrCorrupt)
		}
		var errPrev error
		d, errPrev = s.readCheckpoint(sb.Previous)
		if errPrev != nil {
			return 0, false, fmt.Errorf("current checkpoint: %w; previous checkpoint: %w: %w", errCur, errPrev, ErrCorrupt)
		}
		ref = sb.Previous
		s.note("%v; recovered from the previous checkpoint (seq %d) and a longer journal replay", errCur, ref.Seq)
	}
	vt := &volTable{byID: map[uint32]*volume{}, byName: map[string]*volume{}, nextID: d.nextID}
	for _, v := range d.vols {
		vt.byID[v.id] = v
		vt.byName[v.name] = v
	}
	s.vols.Store(vt)
	s.recountRefs()
	return ref.Seq, errCur != nil, nil
}

func (s *Store) readCheckpoint(ref ckptRef) (*decodedCkpt, error) {
	if ref.Size > s.geo.CkptSize || ref.Area >= ckptAreas {
		return nil, fmt.Errorf("checkpoint reference area %d size %d is out of range", ref.Area, ref.Size)
	}
	off := s.geo.CkptOff[ref.Area]
	buf := alignedBuf(int(roundUp(ref.Size, blockSize)))
	if err := s.readSync(off, buf); err != nil {
		return nil, fmt.Errorf("read checkpoint area %d at offset %d: %w", ref.Area, off, err)
	}
	blob := buf[:ref.Size]
	if checksum(blob) != ref.Sum {
		return nil, fmt.Errorf("checkpoint area %d at offset %d (seq %d) fails its checksum", ref.Area, off, ref.Seq)
	}
	d, err := decodeCheckpoint(blob, s.geo.DataBlocks)
	if err != nil {
		return nil, fmt.Errorf("checkpoint area %d at offset %d: %w", ref.Area, off, err)
	}
	if d.seq != ref.Seq {
		return nil, fmt.Errorf("checkpoint area %d at offset %d holds seq %d, superblock expects %d", ref.Area, off, d.seq, ref.Seq)
	}
	return d, nil
}

// recountRefs derives leaf and block reference counts from the trees.
func (s *Store) recountRefs() {
	for i := range s.refs.n {
		s.refs.n[i].Store(0)
	}
	seen := map[*leaf]bool{}
	var slots int64
	for _, v := range s.table().byID {
		v.t.forEachLeaf(func(_ uint32, l *leaf) {
			slots++
			if seen[l] {
				l.refs.Add(1)
				return
			}
			seen[l] = true
			l.refs.Store(1)
			for i := range l.e {
				if e := l.e[i].Load(); e != 0 {
					s.refs.ref(entryBlock(e))
				}
			}
		})
	}
	s.leafCount.Store(int64(len(seen)))
	s.leafRefs.Store(slots)
}

// replay applies journal entries after seq from and returns the next
// sequence to write. See the decision table in docs/on-disk-format.md.
func (s *Store) replay(from uint64, sb *superblock) (uint64, error) {
	g := s.geo
	n := uint64(g.JournalSlots)
	hbuf := alignedBuf(int(roundUp(n*sectorSize, blockSize)))
	if err := s.readSync(g.HeaderOff, hbuf); err != nil {
		// A latent error in the header ring: read sector by sector so one
		// bad header does not hide the rest.
		hbuf = alignedBuf(len(hbuf))
		for i := range n {
			if s.readSync(g.HeaderOff+i*sectorSize, hbuf[i*sectorSize:(i+1)*sectorSize]) != nil {
				clear(hbuf[i*sectorSize : (i+1)*sectorSize])
			}
		}
	}
	var bodies [2][][]byte
	// Read each ring in large pieces; a piece that fails is read again slot
	// by slot below.
	const piece = 1 << 20
	per := max(1, uint64(piece/g.SlotSize))
	for c := range 2 {
		bodies[c] = make([][]byte, n)
		for first := uint64(0); first < n; first += per {
			k := min(per, n-first)
			b := alignedBuf(int(k * uint64(g.SlotSize)))
			if s.readSync(g.BodyOff[c]+first*uint64(g.SlotSize), b) != nil {
				continue
			}
			for i := range k {
				bodies[c][first+i] = b[i*uint64(g.SlotSize) : (i+1)*uint64(g.SlotSize)]
			}
		}
		for i := range n {
			if bodies[c][i] != nil {
				continue
			}
			b := alignedBuf(int(g.SlotSize))
			off := g.BodyOff[c] + i*uint64(g.SlotSize)
			if err := s.readSync(off, b); err != nil {
				// A latent error somewhere in the slot: read it block by
				// block so an error in the unused tail does not hide the
				// body; an unreadable block reads as zeroes (invalid).
				for o := 0; o < len(b); o += blockSize {
					if s.readSync(off+uint64(o), b[o:o+blockSize]) != nil {
						clear(b[o : o+blockSize])
					}
				}
			}
			bodies[c][i] = b
		}
	}
	header := func(slot uint64) (ringHeader, bool) {
		return decodeRingHeader(hbuf[slot*sectorSize : (slot+1)*sectorSize])
	}
	type fix struct {
		seq    uint64
		header bool // rewrite the header
		copy   int  // rewrite this body copy from the other, or -1
		good   []byte
		size   int
		sum    sum128
	}
	var fixes []fix
	// The newest committed entry: a header names it, or the current
	// checkpoint covers it.
	committed := sb.Current.Seq
	for slot := range n {
		if h, ok := header(slot); ok && h.Seq%n == slot && h.Seq > committed && h.Seq <= from+n {
			committed = h.Seq
		}
	}
	seq := from + 1
	for ; seq <= from+n; seq++ {
		slot := seq % n
		h, hok := header(slot)
		hok = hok && h.Seq == seq
		where := fmt.Sprintf("header at offset %d, body copies at offsets %d and %d",
			g.headerOffset(seq), g.bodyOffset(0, seq), g.bodyOffset(1, seq))
		var payload []byte
		var bsum sum128
		chosen := -1
		anyValid := false
		for c := range 2 {
			p, sum, ok := decodeBody(bodies[c][slot], seq, g.JournalSlots)
			anyValid = anyValid || ok
			if ok && (!hok || sum == h.BodySum) && chosen < 0 {
				payload, bsum, chosen = p, sum, c
			}
		}
		if chosen < 0 {
			switch {
			case hok && anyValid:
				return 0, fmt.Errorf("journal entry %d: header and body disagree (%s): %w", seq, where, ErrCorrupt)
			case hok:
				return 0, fmt.Errorf("journal entry %d: header is valid but both body copies are not (%s): %w", seq, where, ErrCorrupt)
			}
			break
		}
		recs, err := decodeRecords(payload)
		if err != nil {
			return 0, fmt.Errorf("journal entry %d (%s): %w: %w", seq, where, err, ErrCorrupt)
		}
		if !hok && seq > committed {
			// No header and nothing committed after it: either the commit
			// crashed between its body flush and its header (bodies and
			// data durable), or before that flush, or the header was lost.
			// Replay only if every data block the entry maps is intact;
			// otherwise it was never committed and the log ends here. Its
			// superseded blocks are intact too: blocks an entry frees are
			// reused only after the next entry commits.
			if bad := s.verifyEntryData(recs); bad != "" {
				s.log.Info("journal tail entry without header has unflushed data; truncating", "seq", seq, "block", bad)
				break
			}
		}
		f := fix{seq: seq, header: !hok, copy: -1, good: bodies[chosen][slot], size: len(payload), sum: bsum}
		if _, sum, ok := decodeBody(bodies[1-chosen][slot], seq, g.JournalSlots); !ok || sum != bsum {
			f.copy = 1 - chosen
		}
		if f.header || f.copy >= 0 {
			fixes = append(fixes, f)
		}
		var sink blockSink
		for i, r := range recs {
			if err := s.applyRecord(r, &sink); err != nil {
				return 0, fmt.Errorf("journal entry %d (%s), record %d: %w: %w", seq, where, i, err, ErrCorrupt)
			}
		}
	}
	stop := seq
	if from < sb.Current.Seq && stop-1 < sb.Current.Seq {
		return 0, fmt.Errorf("fell back to checkpoint %d but the journal ends at %d, before the current checkpoint %d: %w",
			from, stop-1, sb.Current.Seq, ErrCorrupt)
	}
	// A valid header beyond the stop proves that a committed entry is
	// missing in between. A valid body without header beyond the stop is
	// the rest of an interrupted commit and is erased below.
	type slotCopy struct {
		slot uint64
		copy int
	}
	var erase []slotCopy
	for slot := range n {
		if h, ok := header(slot); ok && h.Seq >= stop && h.Seq%n == slot {
			return 0, fmt.Errorf("journal entry %d (body at offsets %d and %d, header at offset %d) is missing but entry %d (header at offset %d) was committed after it: %w",
				stop, g.bodyOffset(0, stop), g.bodyOffset(1, stop), g.headerOffset(stop), h.Seq, g.HeaderOff+slot*sectorSize, ErrCorrupt)
		}
		for c := range 2 {
			if bs, ok := bodyClaims(bodies[c][slot], g.JournalSlots, slot); ok && bs >= stop {
				erase = append(erase, slotCopy{slot, c})
			}
		}
	}
	for _, f := range fixes {
		if f.copy >= 0 {
			off := g.bodyOffset(f.copy, f.seq)
			if err := s.writeSync(off, f.good); err != nil {
				return 0, fmt.Errorf("repair journal body %d copy %d: %w", f.seq, f.copy, err)
			}
			s.note("journal entry %d: body copy %d at offset %d was damaged; rewrote it from the other copy", f.seq, f.copy, off)
		}
		if f.header {
			h := ringHeader{Seq: f.seq, Size: uint32(f.size), BodySum: f.sum}
			if err := s.writeSync(g.headerOffset(f.seq), h.encode()); err != nil {
				return 0, fmt.Errorf("repair journal header %d: %w", f.seq, err)
			}
			s.note("journal entry %d: header at offset %d was damaged; rewrote it from the intact body", f.seq, g.headerOffset(f.seq))
		}
	}
	for _, e := range erase {
		if err := s.writeSync(g.BodyOff[e.copy]+e.slot*uint64(g.SlotSize), alignedBuf(blockSize)); err != nil {
			return 0, fmt.Errorf("erase interrupted journal body in slot %d copy %d: %w", e.slot, e.copy, err)
		}
	}
	if len(fixes)+len(erase) > 0 {
		if err := s.flushSync(); err != nil {
			return 0, fmt.Errorf("flush journal repair: %w", err)
		}
	}
	return stop, nil
}

var errBadRecord = errors.New("record does not apply")

// verifyEntryData reads every data block the entry's records map and
// returns a description of the first one that is unreadable or fails its
// checksum, or "" when all are intact.
func (s *Store) verifyEntryData(recs []record) string {
	buf := alignedBuf(blockSize)
	for _, r := range recs {
		if r.kind != recSet || r.entry == 0 {
			continue
		}
		p := entryBlock(r.entry)
		if p == 0 || p >= s.geo.DataBlocks {
			return fmt.Sprintf("physical block %d out of range", p)
		}
		if err := s.readSync(s.geo.blockOffset(p), buf); err != nil {
			return fmt.Sprintf("physical block %d: %v", p, err)
		}
		if dataCRC(p, buf) != entryCRC(r.entry) {
			return fmt.Sprintf("physical block %d: checksum mismatch", p)
		}
	}
	return ""
}

// applyRecord replays one journal record during recovery.
func (s *Store) applyRecord(r record, sink *blockSink) error {
	vt := s.table()
	switch r.kind {
	case recSet:
		v := vt.byID[r.vol]
		if v == nil || v.readOnly {
			return fmt.Errorf("set on unknown or read-only volume %d: %w", r.vol, errBadRecord)
		}
		if uint64(r.lblock) >= v.size.Load()/blockSize {
			return fmt.Errorf("set of block %d beyond volume %d: %w", r.lblock, r.vol, errBadRecord)
		}
		if r.entry != 0 && (entryBlock(r.entry) == 0 || entryBlock(r.entry) >= s.geo.DataBlocks) {
			return fmt.Errorf("set maps block %d outside the data zone: %w", entryBlock(r.entry), errBadRecord)
		}
		_, err := s.setEntry(v.t, r.lblock, r.entry, sink)
		return err
	case recCreate:
		return s.createVolume(r.vol, r.name, r.size)
	case recSnapshot, recClone:
		return s.shareVolume(r.kind, r.vol, r.src, r.name)
	case recDelete:
		return s.deleteVolume(r.vol, sink)
	case recResize:
		return s.resizeVolume(r.vol, r.size)
	}
	return fmt.Errorf("kind %d: %w", r.kind, errBadRecord)
}

// replayIntent applies what a crashed predecessor logged but did not
// journal (see intent.go) and returns the blocks it freed. Records queue
// for the next commit like live ones.
func (s *Store) replayIntent(il *IntentLog) blockSink {
	recs, why := intentRecords(il.Mem, s.uuid, il.Boot, s.c.nextSeq-1)
	if why != "" {
		s.log.Info("intent log not replayed", "reason", why)
		return nil
	}
	var sink blockSink
	applied, skipped := 0, 0
	vt := s.table()
	for _, r := range recs {
		v := vt.byID[r.vol]
		if v == nil {
			// Deleted by a commit that finished just before the crash,
			// with the log not yet told.
			continue
		}
		if p := entryBlock(r.entry); r.entry != 0 && (p == 0 || p >= s.geo.DataBlocks || s.refs.n[p].Load() != 0) ||
			v.readOnly || uint64(r.lblock) >= v.size.Load()/blockSize {
			s.note("intent log: record for volume %q block %d (entry %#x) does not fit the recovered store; skipped (its write was never flushed)", v.name, r.lblock, r.entry)
			skipped++
			continue
		}
		if _, err := s.setEntry(v.t, r.lblock, r.entry, &sink); err != nil {
			s.note("intent log: volume %q block %d: %v; skipped (its write was never flushed)", v.name, r.lblock, err)
			skipped++
			continue
		}
		s.admin.recs = append(s.admin.recs, r)
		applied++
	}
	if applied+skipped > 0 {
		s.log.Info("intent log replayed", "records", applied, "skipped", skipped)
	}
	// A block freed by one record may be mapped again by a later one.
	var frees blockSink
	seen := map[uint32]bool{}
	for _, p := range sink {
		if !seen[p] && s.refs.n[p].Load() == 0 {
			seen[p] = true
			frees = append(frees, p)
		}
	}
	return frees
}
