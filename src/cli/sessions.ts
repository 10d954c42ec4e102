// usbroam sessions: the live URB-channel sessions (all of them for admins);
// `usbroam sessions close ID` ends one.
import { Command } from 'commander';
import { Session } from '../gen/usbroam/v1/usbhost.js';
import { clientFrom, reportError, withConnectionFlags, type ConnectionFlags } from './common.js';

export function sessionsCommand(): Command {
  const cmd = withConnectionFlags(new Command('sessions').description('list URB-channel sessions')).action(async (f: ConnectionFlags) => {
    const client = clientFrom(f);
    try {
      const sessions = await client.listSessions();
      if (f.json) console.log(JSON.stringify(sessions.map((s) => Session.toJSON(s)), null, 2));
      else if (!sessions.length) console.log('no sessions');
      else
        for (const s of sessions) {
          console.log(`${s.id}  ${s.deviceId.padEnd(10)} ${s.identity.padEnd(10)} ${s.state.padEnd(9)} in-flight ${s.urbsInFlight}  completed ${s.urbsCompleted}  ${s.peer}`);
        }
    } catch (err) {
      reportError(err);
    } finally {
      client.close();
    }
  });
  cmd.addCommand(
    withConnectionFlags(new Command('close').description('end a session: cancel its URBs, reset and release its device').argument('<session-id>')).action(
      async (id: string, _: ConnectionFlags, self: Command) => {
        // Flags may land on `sessions` or on `close`: take both.
        const f = self.optsWithGlobals<ConnectionFlags>();
        const client = clientFrom(f);
        try {
          await client.closeSession(id);
          if (!f.json) console.log(`closed ${id}`);
        } catch (err) {
          reportError(err);
        } finally {
          client.close();
        }
      },
    ),
  );
  return cmd;
}
