// Starts kinesalite (a Kinesis API server) on 127.0.0.1 only, in memory, for Sluice's tests.
//   node scripts/kinesalite.js PORT     (with kinesalite on NODE_PATH)
// Its own CLI listens on every interface; this binds the loopback address.
const kinesalite = require('kinesalite');
const port = Number(process.argv[2] || 4567);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 100 });
server.listen(port, '127.0.0.1', (err) => {
  if (err) throw err;
  console.log(`kinesalite listening on 127.0.0.1:${port}`);
});
